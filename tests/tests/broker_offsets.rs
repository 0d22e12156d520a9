//! Issue 3 over real gRPC: ListOffsets, and group offsets (commit, fetch, lag, resets).

use rill_proto::v1 as pb;
use rill_tests::{produce_req, record, Clients, TestBroker};
use tonic::Code;

#[tokio::test]
async fn list_offsets_by_position_and_time() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("times", 1).await.expect("create");
    let records = (0..10)
        .map(|i| record(None, "v", Some(1000 * i), &[]))
        .collect();
    c.log
        .produce(produce_req("times", Some(0), records))
        .await
        .expect("produce");
    let lookup = |spec| pb::ListOffsetsRequest {
        topic: "times".into(),
        partition: 0,
        spec: Some(spec),
    };
    use pb::list_offsets_request::Spec;
    let at = |c: &mut Clients, spec| {
        let mut log = c.log.clone();
        async move {
            log.list_offsets(lookup(spec))
                .await
                .expect("list")
                .into_inner()
                .offset
        }
    };
    assert_eq!(
        at(&mut c, Spec::Position(pb::OffsetSpec::Earliest as i32)).await,
        0
    );
    assert_eq!(
        at(&mut c, Spec::Position(pb::OffsetSpec::Latest as i32)).await,
        10
    );
    assert_eq!(at(&mut c, Spec::TimestampMs(4500)).await, 5);
    assert_eq!(at(&mut c, Spec::TimestampMs(99_999)).await, 10);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn group_offsets_commit_fetch_lag_and_reset() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("g-topic", 2).await.expect("create");
    let records = (0..10)
        .map(|i| record(None, "v", Some(1000 * i), &[]))
        .collect();
    c.log
        .produce(produce_req("g-topic", Some(0), records))
        .await
        .expect("produce");
    c.produce_values("g-topic", 1, &["a", "b", "c", "d"])
        .await
        .expect("produce");
    c.groups
        .commit_offsets(pb::CommitOffsetsRequest {
            group: "app".into(),
            topic: "g-topic".into(),
            offsets: vec![
                pb::PartitionOffset {
                    partition: 0,
                    offset: 4,
                    metadata: Some("m".into()),
                },
                pb::PartitionOffset {
                    partition: 1,
                    offset: 1,
                    metadata: None,
                },
            ],
            member: None,
        })
        .await
        .expect("commit");
    let fetched = c
        .groups
        .fetch_offsets(pb::FetchOffsetsRequest {
            group: "app".into(),
            topic: "g-topic".into(),
            partitions: vec![],
        })
        .await
        .expect("fetch offsets")
        .into_inner();
    assert_eq!(
        fetched.offsets.iter().map(|o| o.offset).collect::<Vec<_>>(),
        vec![Some(4), Some(1)]
    );
    let listed = c
        .groups
        .list_groups(pb::ListGroupsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.groups, vec!["app".to_string()]);
    let described = c
        .groups
        .describe_group(pb::DescribeGroupRequest {
            group: "app".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    let lags: Vec<(u32, u64, u64)> = described
        .partitions
        .iter()
        .map(|p| (p.partition, p.committed_offset, p.lag))
        .collect();
    assert_eq!(lags, vec![(0, 4, 6), (1, 1, 3)]);

    use pb::reset_group_offsets_request::Target;
    let reset = |target, dry_run| pb::ResetGroupOffsetsRequest {
        group: "app".into(),
        topic: "g-topic".into(),
        partitions: vec![0],
        target: Some(target),
        dry_run,
    };
    let cases = [
        (Target::ToEarliest(true), 0),
        (Target::ToLatest(true), 10),
        (Target::ToOffset(7), 7),
        (Target::ToOffset(70), 10), // clamped to the high watermark
        (Target::ToTimestampMs(2500), 3),
        (Target::ShiftBy(-2), 2), // from the committed 4
    ];
    for (target, expected) in cases {
        let dry = c
            .groups
            .reset_group_offsets(reset(target, true))
            .await
            .expect("dry run")
            .into_inner();
        assert!(!dry.applied);
        assert_eq!(
            (dry.changes[0].previous_offset, dry.changes[0].new_offset),
            (Some(4), expected)
        );
        let now = c
            .groups
            .fetch_offsets(pb::FetchOffsetsRequest {
                group: "app".into(),
                topic: "g-topic".into(),
                partitions: vec![0],
            })
            .await
            .expect("fetch")
            .into_inner();
        assert_eq!(now.offsets[0].offset, Some(4), "a dry run changes nothing");
    }
    let applied = c
        .groups
        .reset_group_offsets(reset(Target::ToEarliest(true), false))
        .await
        .expect("reset")
        .into_inner();
    assert!(applied.applied);
    let now = c
        .groups
        .fetch_offsets(pb::FetchOffsetsRequest {
            group: "app".into(),
            topic: "g-topic".into(),
            partitions: vec![0],
        })
        .await
        .expect("fetch")
        .into_inner();
    assert_eq!(now.offsets[0].offset, Some(0));
    let unknown = c
        .groups
        .describe_group(pb::DescribeGroupRequest {
            group: "nobody".into(),
        })
        .await
        .expect_err("unknown group");
    assert_eq!(unknown.code(), Code::NotFound);
    broker.stop().await.expect("stop");
}
