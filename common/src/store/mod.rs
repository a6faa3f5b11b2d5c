//! The local Nix store, as nixq writes to it directly: Nix's per-path locks
//! and batch validity registration. Everything else about the store goes
//! through the daemon client ([`crate::daemon`]).

pub mod batch;
pub mod lock;
pub mod register;

pub use batch::{BatchError, RegistrationBatcher};
pub use lock::PathLock;
pub use register::{register_validity, Registrar, Registration};
