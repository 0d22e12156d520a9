//! The `rill.v1` gRPC contract and the Rust code generated from it.
//!
//! # The map
//! - `rill/v1/*.proto` (beside this crate) is the contract: every message and field is
//!   commented there, for clients in any language.
//!   - `records.proto`: records, headers, ack modes.
//!   - `log.proto`: the `Log` service: Produce, ProduceStream, Fetch, ListOffsets.
//!   - `groups.proto`: the `Groups` service: committed offsets, lag, resets.
//!   - `admin.proto`: the `Admin` service: topics.
//!   - `raft.proto`: the internal `Raft` service: broker-to-broker consensus traffic, by group.
//!   - `cluster.proto`: the `Cluster` service: metadata (who leads what) and cluster status.
//!   - `subscriptions.proto`: the `Subscriptions` service: queue subscriptions (per-record
//!     acks, redelivery, dead letters) and push delivery with credits.
//! - [`v1`]: the generated messages, servers (`v1::log_server::LogServer`, …) and clients
//!   (`v1::log_client::LogClient`, …). Every `bytes` field is a [`bytes::Bytes`], so decoding
//!   shares the request buffer instead of copying.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for server reflection.
//! - [`codec`]: the codec of the generated code: prost, with undecodable messages refused as
//!   INVALID_ARGUMENT instead of INTERNAL.
//! - [`partitioner`]: the documented key partitioner (Kafka's murmur2), shared by the broker
//!   and clients.
//!
//! # Regenerating
//! Nothing generated is checked in. `build.rs` compiles every `rill/v1/*.proto` with protox
//! (pure Rust, no system `protoc`), writes the descriptor set to `OUT_DIR`, and hands it to
//! tonic-prost-build (`compile_fds`), which writes `rill.v1.rs` there. Editing or adding a
//! `.proto` reruns it on the next `cargo build`. Every message, field, oneof, enum value,
//! service and rpc must carry a comment; a unit test enforces it.

#![warn(missing_docs)]

pub mod codec;
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

    /// The contract is read by other languages: every element must carry a comment.
    #[test]
    fn every_element_of_the_contract_is_commented() {
        // Field numbers of descriptor.proto, as used in SourceCodeInfo paths.
        const MESSAGE: i32 = 4;
        const ENUM: i32 = 5;
        const SERVICE: i32 = 6;
        const MSG_FIELD: i32 = 2;
        const MSG_NESTED: i32 = 3;
        const MSG_ENUM: i32 = 4;
        const MSG_ONEOF: i32 = 8;
        const ENUM_VALUE: i32 = 2;
        const METHOD: i32 = 2;

        fn message(
            m: &prost_types::DescriptorProto,
            path: Vec<i32>,
            name: String,
            out: &mut Vec<(Vec<i32>, String)>,
        ) {
            for (i, f) in m.field.iter().enumerate() {
                out.push((at(&path, MSG_FIELD, i), format!("{name}.{}", f.name())));
            }
            for (i, o) in m.oneof_decl.iter().enumerate() {
                // A proto3 `optional` field makes a synthetic oneof with no source text.
                let synthetic = m.field.iter().any(|f| {
                    f.proto3_optional() && f.oneof_index == Some(i32::try_from(i).expect("index"))
                });
                if synthetic {
                    continue;
                }
                out.push((at(&path, MSG_ONEOF, i), format!("{name}.{}", o.name())));
            }
            for (i, e) in m.enum_type.iter().enumerate() {
                let n = format!("{name}.{}", e.name());
                enumeration(e, at(&path, MSG_ENUM, i), n, out);
            }
            for (i, n) in m.nested_type.iter().enumerate() {
                let nn = format!("{name}.{}", n.name());
                message(n, at(&path, MSG_NESTED, i), nn, out);
            }
            out.push((path, name));
        }
        fn enumeration(
            e: &prost_types::EnumDescriptorProto,
            path: Vec<i32>,
            name: String,
            out: &mut Vec<(Vec<i32>, String)>,
        ) {
            for (i, v) in e.value.iter().enumerate() {
                out.push((at(&path, ENUM_VALUE, i), format!("{name}.{}", v.name())));
            }
            out.push((path, name));
        }
        fn at(path: &[i32], kind: i32, index: usize) -> Vec<i32> {
            let mut p = path.to_vec();
            p.extend([kind, i32::try_from(index).expect("index")]);
            p
        }

        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("decode");
        let mut missing = Vec::new();
        let mut checked = 0;
        for file in &fds.file {
            let info = file.source_code_info.as_ref().expect("source info kept");
            let mut elements = Vec::new();
            for (i, m) in file.message_type.iter().enumerate() {
                message(m, at(&[], MESSAGE, i), m.name().to_string(), &mut elements);
            }
            for (i, e) in file.enum_type.iter().enumerate() {
                enumeration(e, at(&[], ENUM, i), e.name().to_string(), &mut elements);
            }
            for (i, s) in file.service.iter().enumerate() {
                for (j, m) in s.method.iter().enumerate() {
                    let path = at(&at(&[], SERVICE, i), METHOD, j);
                    elements.push((path, format!("{}.{}", s.name(), m.name())));
                }
                elements.push((at(&[], SERVICE, i), s.name().to_string()));
            }
            for (path, name) in elements {
                checked += 1;
                let commented = info
                    .location
                    .iter()
                    .any(|l| l.path == path && !l.leading_comments().trim().is_empty());
                if !commented {
                    missing.push(format!("{}: {name}", file.name()));
                }
            }
        }
        assert!(checked > 100, "only {checked} elements found");
        assert!(missing.is_empty(), "without a comment: {missing:#?}");
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
            ..Default::default()
        };
        let buf = req.encode_to_vec();
        assert_eq!(
            v1::ProduceRequest::decode(buf.as_slice()).expect("decode"),
            req
        );
    }
}
