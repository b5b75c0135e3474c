//! soci-node: make the SOCI snapshotter active on a Kubernetes node before its
//! first image pull, and never leave the node unbootable.
//!
//! Pure decision logic (`decide`, `soci`, `containerd`, `kubelet`, parsers in
//! `storage`) is kept apart from host I/O (`facts`, `fsio`, `status`,
//! `preflight`), so most behaviour is tested without a host.

pub mod apply;
pub mod cli;
pub mod containerd;
pub mod decide;
pub mod doctor;
pub mod facts;
pub mod fsio;
pub mod hostpath;
pub mod imds;
pub mod kubelet;
pub mod logging;
pub mod nodeadm;
pub mod preflight;
pub mod prime;
pub mod registry;
pub mod revert;
pub mod run;
pub mod settings;
pub mod soci;
pub mod status;
pub mod storage;
pub mod systemd;
pub mod version;
