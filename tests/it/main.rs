//! tollgate's integration tests: one binary, each test against a real
//! server on 127.0.0.1:0 and its own database (SQLite, or PostgreSQL with
//! `TEST_DATABASE_URL`).

mod helpers;

mod api_conventions;
mod audit;
mod backup;
mod billing_events;
mod cache;
mod catalog;
mod checkout;
mod cli;
mod customers;
mod delivery;
mod doctor;
mod emulator;
mod emulator_state;
mod idempotency;
mod openapi;
mod operations;
mod processes;
mod ratelimit;
mod selling;
mod store;
mod stripe_client;
mod tls;
mod tokens;
mod webhooks;
