//! tollgate: a self-hosted billing gateway.
//!
//! The layout follows the money: requests arrive in [`http`], provider
//! webhooks in `webhooks`, business rules live in [`billing`], state in
//! [`store`], and background work in [`jobs`].

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod billing;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod http;
pub mod ids;
pub mod jobs;
pub mod ops;
pub mod providers;
pub mod ratelimit;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod webhooks;

pub use app::run;
pub use config::Config;
