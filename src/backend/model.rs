//! model backend (being written)
