//! Why `rill consume` printed nothing: a read that stops at the end of the log and found no
//! records says so on stderr instead of exiting silently.

/// Where a consume started, as the command line asked.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// `--offset N`.
    Offset(u64),
    /// `--since`: the first record at or after this time, ms since the epoch.
    Since(i64),
    /// `--group G` without a start flag: the group's committed offsets.
    Group(&'a str),
    /// `--from-beginning`, or no start flag and no group.
    Beginning,
}

/// One partition as the read saw it at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSpan {
    /// The partition.
    pub partition: u32,
    /// Where reading started.
    pub position: u64,
    /// The first offset still retained.
    pub log_start: u64,
    /// The high watermark (the end) when the read started.
    pub high_watermark: u64,
}

/// The note printed (after `note: `) when a read that stops at the end printed nothing.
pub fn why_empty(topic: &str, start: Start<'_>, spans: &[PartitionSpan]) -> String {
    let tail = "; nothing arrived before the end seen at start (-f waits for new records)";
    let ends = high_watermarks(spans);
    let scope = match spans {
        [one] => format!("partition {} of topic {topic:?}", one.partition),
        _ => format!("topic {topic:?}"),
    };
    let reason = match start {
        Start::Offset(offset) => {
            let place = if spans.iter().all(|s| offset > s.high_watermark) {
                "past the end"
            } else if spans.iter().all(|s| offset == s.high_watermark) {
                "at the end"
            } else {
                "at or past the end"
            };
            match spans {
                [one] => format!(
                    "offset {offset} is {place} of partition {} (high watermark {})",
                    one.partition, one.high_watermark
                ),
                _ => format!("offset {offset} is {place} of every partition ({ends})"),
            }
        }
        Start::Since(ms) => {
            let when = humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
            );
            format!("no record in {scope} is at or after {when}: all are older ({ends})")
        }
        _ if spans.iter().all(|s| s.log_start >= s.high_watermark) => {
            if spans.iter().all(|s| s.high_watermark == 0) {
                format!("{scope} is empty: nothing was ever produced to it ({ends})")
            } else {
                format!("{scope} holds no records: retention deleted them all ({ends})")
            }
        }
        Start::Group(group) => {
            format!("group {group:?} has read everything: it is at the end of {scope} ({ends})")
        }
        Start::Beginning => format!("nothing to read in {scope} ({ends})"),
    };
    format!("{reason}{tail}")
}

/// `high watermark N` for one partition, `high watermarks 0:N, 1:M` for several.
fn high_watermarks(spans: &[PartitionSpan]) -> String {
    match spans {
        [one] => format!("high watermark {}", one.high_watermark),
        _ => {
            let list: Vec<String> = spans
                .iter()
                .map(|s| format!("{}:{}", s.partition, s.high_watermark))
                .collect();
            format!("high watermarks {}", list.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(partition: u32, position: u64, log_start: u64, high_watermark: u64) -> PartitionSpan {
        PartitionSpan {
            partition,
            position,
            log_start,
            high_watermark,
        }
    }

    #[test]
    fn an_offset_past_the_end_names_the_high_watermark() {
        assert_eq!(
            why_empty("orders", Start::Offset(99), &[span(0, 99, 0, 1)]),
            "offset 99 is past the end of partition 0 (high watermark 1); nothing arrived \
             before the end seen at start (-f waits for new records)"
        );
        let note = why_empty("orders", Start::Offset(1), &[span(0, 1, 0, 1)]);
        assert!(
            note.starts_with("offset 1 is at the end of partition 0 (high watermark 1);"),
            "{note}"
        );
        let note = why_empty(
            "orders",
            Start::Offset(5),
            &[span(0, 5, 0, 5), span(1, 5, 0, 2)],
        );
        assert!(
            note.starts_with(
                "offset 5 is at or past the end of every partition (high watermarks 0:5, 1:2)"
            ),
            "{note}"
        );
    }

    #[test]
    fn since_after_the_newest_record_and_an_empty_topic_say_so() {
        let note = why_empty("orders", Start::Since(1_000), &[span(0, 3, 0, 3)]);
        assert!(
            note.starts_with(
                "no record in partition 0 of topic \"orders\" is at or after \
                 1970-01-01T00:00:01.000Z: all are older (high watermark 3)"
            ),
            "{note}"
        );
        let note = why_empty("t", Start::Beginning, &[span(0, 0, 0, 0), span(1, 0, 0, 0)]);
        assert!(
            note.starts_with(
                "topic \"t\" is empty: nothing was ever produced to it (high watermarks 0:0, 1:0)"
            ),
            "{note}"
        );
        let note = why_empty("t", Start::Group("g"), &[span(0, 7, 7, 7)]);
        assert!(note.contains("retention deleted them all"), "{note}");
        let note = why_empty("t", Start::Group("g"), &[span(0, 7, 2, 7)]);
        assert!(
            note.starts_with("group \"g\" has read everything"),
            "{note}"
        );
    }
}
