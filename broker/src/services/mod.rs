//! The gRPC services. Each handler converts its request, calls the broker logic, and turns a
//! [`crate::BrokerError`] into a status through the one mapping in [`crate::error`].

mod admin;
mod groups;
mod log;
mod security;
pub mod subscriptions;

pub use admin::AdminService;
pub use groups::GroupsService;
pub use log::LogService;
pub use security::{rule_from_pb, rule_to_pb, SecurityService};
pub use subscriptions::SubscriptionsService;
