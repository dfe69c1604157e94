//! The business rules of selling and granting, with no I/O: what the catalog
//! may say, how money is represented, and (in later modules) how orders,
//! subscriptions and entitlements move between states.

pub mod catalog;
pub mod checkout;
pub mod entitlements;
pub mod money;
pub mod ordering;
pub mod orders;
