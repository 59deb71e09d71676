//! Work in progress (this session).
