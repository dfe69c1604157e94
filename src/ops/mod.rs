//! Operator commands that are more than a store call: backups, restore
//! drills, the readiness doctor, reconciliation and load tests.

pub mod backup;
pub mod catalog_sync;
pub mod doctor;
pub mod drill;
pub mod loadtest;
pub mod reconcile;
pub mod report;
pub mod stripe_setup;
