//! The gRPC services. Each handler converts its request, calls the broker logic, and turns a
//! [`crate::BrokerError`] into a status through the one mapping in [`crate::error`].
//! [`LogRoutes`] serves the Log service: Fetch framed by hand (no copy of stored batches),
//! the other RPCs through the generated [`LogService`] server.

mod admin;
mod fetch_wire;
mod groups;
mod log;
mod security;
pub mod subscriptions;

pub use admin::AdminService;
pub use fetch_wire::{encode_response, FrameBody, LogRoutes};
pub use groups::GroupsService;
pub use log::LogService;
pub use security::{rule_from_pb, rule_to_pb, SecurityService};
pub use subscriptions::SubscriptionsService;
