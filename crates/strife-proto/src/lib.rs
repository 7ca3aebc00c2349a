//! Strife's wire protocol, generated from `proto/` at build time.
#![allow(clippy::all, missing_docs)]

pub mod bank {
    pub mod v1 {
        tonic::include_proto!("strife.bank.v1");
    }
}

pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("strife.gateway.v1");
    }
}

/// etcd's v3 API, the part Strife's discovery uses (`etcd/etcd.proto`):
/// clients only.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Encoded file descriptors of every service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("strife_descriptor");
