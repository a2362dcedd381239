//! botrelay, the data plane: an HTTP relay between a back-end and a bot.
//!
//! A back-end posts user messages ([`api`]); each is stored durably ([`store`],
//! through the group-commit [`writer`]) before it is acknowledged, then
//! delivered to the bot in order per conversation ([`delivery`]); the bot's
//! replies travel the same way to the back-end's response endpoint. Every
//! request the relay sends is signed ([`signing`]). [`app`] wires it together.

pub mod admin;
pub mod api;
pub mod app;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod delivery;
pub mod disk;
pub mod ids;
pub mod json;
pub mod logging;
pub mod metrics;
pub mod outgoing;
pub mod serve;
pub mod signing;
pub mod store;
pub mod trace;
pub mod turns;
pub mod wire;
pub mod writer;
