//! Payment providers: the clients tollgate uses to talk to them, and the
//! built-in Stripe emulator that stands in for Stripe offline.

pub mod stripe;
pub mod stripe_emulator;
