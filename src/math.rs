//! clock math (being written)
