//! Operator commands that are more than a store call: load tests now;
//! backups, drills, doctor and reconciliation as they arrive.

pub mod catalog_sync;
pub mod loadtest;
pub mod reconcile;
pub mod stripe_setup;
