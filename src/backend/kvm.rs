//! kvm backend (being written)
