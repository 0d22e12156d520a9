//! The `rill.v1` gRPC contract and the Rust code generated from it.
//!
//! # The map
//! - `rill/v1/*.proto` (beside this crate) is the contract: every message and field is
//!   commented there, for clients in any language.
//!   - `records.proto`: records, headers, ack modes.
//!   - `log.proto`: the `Log` service: Produce, ProduceStream, Fetch, ListOffsets.
//!   - `groups.proto`: the `Groups` service: committed offsets, lag, resets.
//!   - `admin.proto`: the `Admin` service: topics.
//! - [`v1`]: the generated messages, servers (`v1::log_server::LogServer`, …) and clients
//!   (`v1::log_client::LogClient`, …). Every `bytes` field is a [`bytes::Bytes`], so decoding
//!   shares the request buffer instead of copying.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for server reflection.
//! - [`partitioner`]: the documented key partitioner (Kafka's murmur2), shared by the broker
//!   and clients.
//!
//! The code is generated at build time by `build.rs` with protox and tonic-prost-build.

pub mod partitioner;

/// The generated `rill.v1` messages, servers and clients.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("rill.v1");
}

/// The encoded `FileDescriptorSet` of the `rill.v1` protos, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rill_descriptor.bin"));

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn descriptor_set_names_the_services() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("decode");
        let services: Vec<String> = fds
            .file
            .iter()
            .flat_map(|f| {
                let pkg = f.package().to_string();
                f.service.iter().map(move |s| format!("{pkg}.{}", s.name()))
            })
            .collect();
        for s in ["rill.v1.Log", "rill.v1.Groups", "rill.v1.Admin"] {
            assert!(services.iter().any(|x| x == s), "{s} in {services:?}");
        }
    }

    #[test]
    fn produce_request_round_trips_with_bytes() {
        let req = v1::ProduceRequest {
            topic: "t".into(),
            partition: Some(2),
            ack: v1::AckMode::Durable as i32,
            payload: Some(v1::produce_request::Payload::Records(v1::RecordList {
                records: vec![v1::Record {
                    key: Some(bytes::Bytes::from_static(b"k")),
                    value: bytes::Bytes::from_static(b"v"),
                    headers: vec![v1::Header {
                        key: "h".into(),
                        value: bytes::Bytes::from_static(b"x"),
                    }],
                    timestamp_ms: Some(5),
                }],
            })),
        };
        let buf = req.encode_to_vec();
        assert_eq!(v1::ProduceRequest::decode(buf.as_slice()).expect("decode"), req);
    }
}
