//! fjord's node agent: owns the node's networking (the network namespace it
//! runs in), serves the CNI plugin and fjordctl on a unix socket.
pub mod agent;
pub mod cluster;
pub mod gatewayapi;
pub mod health;
pub mod ipam;
pub mod lag;
pub mod metrics;
pub mod plumbing;
pub mod server;
pub mod services;
