//! fjord's own validated model. Pure: no I/O.
//!
//! - [`cni`]: CNI spec 1.1.0 configuration, environment, results and errors.
//! - [`api`]: the node agent's API types.
//! - [`keys`]: the store's key layout.
pub mod api;
pub mod cni;
pub mod keys;
pub mod objects;
