//! `rill top`: a live view of a broker, refreshed every second from its RPCs (ListTopics,
//! DescribeTopic, ListGroups, DescribeGroup), not from the metrics endpoint.
//!
//! Rates are deltas between two samples over the time between them: a topic's produce rate
//! from its high watermarks, its fetch rate from the broker's fetched-records counter, a
//! group's lag trend from its lag. The screen is drawn with ratatui on crossterm; `q`, `Esc`
//! or Ctrl-C quit and give the terminal back as it was. `--once` prints one view (two
//! samples one interval apart) and exits, as JSON with `--output json`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use crossterm::event::{Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Row, Table};
use ratatui::Frame;
use serde::Serialize;

use super::{print_table, Ctx, Output};
use crate::admin::Admin;
use crate::connection::Connection;

/// `rill top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Print one view (two samples one interval apart) and exit, instead of the live screen.
    #[arg(long)]
    pub once: bool,
    /// Time between samples, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
}

/// One topic's figures at one moment.
#[derive(Debug, Clone, Default)]
struct TopicSample {
    partitions: u32,
    high_watermark: u64,
    records_fetched: u64,
    waiting_fetches: u64,
    fenced_partitions: u32,
}

/// One group's figures at one moment.
#[derive(Debug, Clone, Default)]
struct GroupSample {
    topics: BTreeSet<String>,
    committed: u64,
    lag: u64,
}

/// Everything read from the broker at one moment.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    topics: BTreeMap<String, TopicSample>,
    groups: BTreeMap<String, GroupSample>,
}

/// A topic's line of the view.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopicView {
    /// The topic.
    pub topic: String,
    /// Its partitions.
    pub partitions: u32,
    /// The sum of its partitions' high watermarks (records ever appended, retained or not).
    pub high_watermark: u64,
    /// Records fetched from it since the broker started.
    pub records_fetched: u64,
    /// Records appended per second over the interval.
    pub produce_per_sec: f64,
    /// Records fetched per second over the interval.
    pub fetch_per_sec: f64,
    /// Long-poll fetches waiting on it now.
    pub waiting_fetches: u64,
    /// Partitions refusing writes.
    pub fenced_partitions: u32,
}

/// A group's line of the view.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupView {
    /// The group.
    pub group: String,
    /// The topics it has committed offsets for.
    pub topics: Vec<String>,
    /// Records past its committed offsets, over all its partitions.
    pub lag: u64,
    /// How fast the lag changes, in records per second (positive: falling behind).
    pub lag_per_sec: f64,
    /// Records committed per second over the interval.
    pub commit_per_sec: f64,
}

/// One view: two samples compared.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct View {
    /// The time between the two samples, in milliseconds.
    pub interval_ms: u64,
    /// Every topic, by name.
    pub topics: Vec<TopicView>,
    /// Every group, by name.
    pub groups: Vec<GroupView>,
    /// Long-poll fetches waiting now, over all topics.
    pub waiting_fetches: u64,
}

/// Reads one sample from the broker.
async fn sample(admin: &Admin) -> Result<Sample> {
    let mut topics = BTreeMap::new();
    for summary in admin.list_topics().await.context("listing topics")? {
        // A topic deleted since the listing is left out.
        let Ok(d) = admin.describe_topic(&summary.name).await else {
            continue;
        };
        let t = TopicSample {
            partitions: d.partitions.len() as u32,
            high_watermark: d.partitions.iter().map(|p| p.high_watermark).sum(),
            records_fetched: d.records_fetched,
            waiting_fetches: d
                .partitions
                .iter()
                .map(|p| u64::from(p.waiting_fetches))
                .sum(),
            fenced_partitions: d
                .partitions
                .iter()
                .filter(|p| p.fenced_reason.is_some())
                .count() as u32,
        };
        topics.insert(d.name, t);
    }
    let mut groups = BTreeMap::new();
    for name in admin.list_groups().await.context("listing groups")? {
        let Ok(d) = admin.describe_group(&name).await else {
            continue;
        };
        let g = GroupSample {
            topics: d.partitions.iter().map(|p| p.topic.clone()).collect(),
            committed: d.partitions.iter().map(|p| p.committed_offset).sum(),
            lag: d.partitions.iter().map(|p| p.lag).sum(),
        };
        groups.insert(name, g);
    }
    Ok(Sample {
        at: Instant::now(),
        topics,
        groups,
    })
}

/// `(now - before) / seconds`, or 0 for a counter that went back (a topic recreated).
fn rate(now: u64, before: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 || now < before {
        0.0
    } else {
        (now - before) as f64 / seconds
    }
}

/// Compares two samples.
fn view(before: &Sample, now: &Sample) -> View {
    let seconds = now.at.duration_since(before.at).as_secs_f64();
    let topics: Vec<TopicView> = now
        .topics
        .iter()
        .map(|(name, t)| {
            let prev = before.topics.get(name).cloned().unwrap_or_default();
            TopicView {
                topic: name.clone(),
                partitions: t.partitions,
                high_watermark: t.high_watermark,
                records_fetched: t.records_fetched,
                produce_per_sec: rate(t.high_watermark, prev.high_watermark, seconds),
                fetch_per_sec: rate(t.records_fetched, prev.records_fetched, seconds),
                waiting_fetches: t.waiting_fetches,
                fenced_partitions: t.fenced_partitions,
            }
        })
        .collect();
    let groups = now
        .groups
        .iter()
        .map(|(name, g)| {
            let prev = before.groups.get(name).cloned().unwrap_or_default();
            GroupView {
                group: name.clone(),
                topics: g.topics.iter().cloned().collect(),
                lag: g.lag,
                lag_per_sec: if seconds > 0.0 {
                    (g.lag as f64 - prev.lag as f64) / seconds
                } else {
                    0.0
                },
                commit_per_sec: rate(g.committed, prev.committed, seconds),
            }
        })
        .collect();
    View {
        interval_ms: u64::try_from(now.at.duration_since(before.at).as_millis())
            .unwrap_or(u64::MAX),
        waiting_fetches: topics.iter().map(|t| t.waiting_fetches).sum(),
        topics,
        groups,
    }
}

/// Runs `rill top`.
pub async fn top(conn: Connection, ctx: Ctx, args: TopArgs, broker: &str) -> Result<()> {
    let admin = Admin::new(conn);
    let interval = Duration::from_millis(args.interval_ms);
    if args.once {
        let first = sample(&admin).await?;
        tokio::time::sleep(interval).await;
        let second = sample(&admin).await?;
        return print_view(ctx, &view(&first, &second));
    }
    live(&admin, interval, broker).await
}

fn print_view(ctx: Ctx, v: &View) -> Result<()> {
    match ctx.output {
        Output::Json => super::print_json(&serde_json::to_value(v)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = topic_rows(v);
            print_table(&TOPIC_HEADER, &rows)?;
            println!();
            print_table(&GROUP_HEADER, &group_rows(v))
        }
    }
}

const TOPIC_HEADER: [&str; 6] = [
    "TOPIC",
    "PARTITIONS",
    "PRODUCE/S",
    "FETCH/S",
    "HIGH WATERMARK",
    "WAITING",
];
const GROUP_HEADER: [&str; 5] = ["GROUP", "TOPICS", "LAG", "TREND/S", "COMMIT/S"];

fn topic_rows(v: &View) -> Vec<Vec<String>> {
    v.topics
        .iter()
        .map(|t| {
            let mut name = t.topic.clone();
            if t.fenced_partitions > 0 {
                name.push_str(&format!(" ({} fenced)", t.fenced_partitions));
            }
            vec![
                name,
                t.partitions.to_string(),
                format!("{:.1}", t.produce_per_sec),
                format!("{:.1}", t.fetch_per_sec),
                t.high_watermark.to_string(),
                t.waiting_fetches.to_string(),
            ]
        })
        .collect()
}

fn group_rows(v: &View) -> Vec<Vec<String>> {
    v.groups
        .iter()
        .map(|g| {
            let arrow = if g.lag_per_sec > 0.0 {
                "↑"
            } else if g.lag_per_sec < 0.0 {
                "↓"
            } else {
                "→"
            };
            vec![
                g.group.clone(),
                g.topics.join(","),
                g.lag.to_string(),
                format!("{arrow} {:+.1}", g.lag_per_sec),
                format!("{:.1}", g.commit_per_sec),
            ]
        })
        .collect()
}

/// What ends the live view.
enum Input {
    Quit,
}

/// The live screen: samples every `interval`, draws, quits on `q`, `Esc` or Ctrl-C.
async fn live(admin: &Admin, interval: Duration, broker: &str) -> Result<()> {
    let mut previous = sample(admin).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Input>(1);
    // crossterm's event reads block: a plain thread forwards the keys that quit. It stays
    // blocked in `read` after the view ends, and ends with the process.
    std::thread::spawn(move || loop {
        match crossterm::event::read() {
            Ok(Event::Key(key)) if key.kind != KeyEventKind::Release => {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                    let _ = tx.blocking_send(Input::Quit);
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => {
                let _ = tx.blocking_send(Input::Quit);
                return;
            }
        }
    });
    // Raw mode and the alternate screen; restored on every way out, panics included (ratatui
    // installs a hook for that).
    let mut terminal = ratatui::init();
    let result = async {
        let mut current = view(&previous, &previous);
        let mut status = String::from("sampling…");
        loop {
            terminal.draw(|f| draw(f, &current, broker, &status))?;
            tokio::select! {
                _ = rx.recv() => return Ok::<(), anyhow::Error>(()),
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = tokio::time::sleep(interval) => {}
            }
            match sample(admin).await {
                Ok(next) => {
                    current = view(&previous, &next);
                    previous = next;
                    status = format!("every {} ms · q to quit", interval.as_millis());
                }
                Err(e) => status = format!("broker unreachable: {e:#} · q to quit"),
            }
        }
    }
    .await;
    ratatui::restore();
    result
}

fn draw(f: &mut Frame, v: &View, broker: &str, status: &str) {
    let [head, topics, groups] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Percentage(50),
        Constraint::Fill(1),
    ])
    .areas(f.area());
    f.render_widget(
        Line::from(format!(
            "rill top · {broker} · waiting long-polls: {} · {status}",
            v.waiting_fetches
        )),
        head,
    );
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let table = |header: &[&str], rows: Vec<Vec<String>>, title: &str, widths: Vec<Constraint>| {
        Table::new(rows.into_iter().map(Row::new), widths)
            .header(Row::new(header.iter().map(|h| h.to_string())).style(bold))
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(title.to_string()),
            )
    };
    f.render_widget(
        table(
            &TOPIC_HEADER,
            topic_rows(v),
            " Topics ",
            vec![
                Constraint::Fill(2),
                Constraint::Length(10),
                Constraint::Length(12),
                Constraint::Length(12),
                Constraint::Length(15),
                Constraint::Length(8),
            ],
        ),
        topics,
    );
    f.render_widget(
        table(
            &GROUP_HEADER,
            group_rows(v),
            " Groups ",
            vec![
                Constraint::Fill(1),
                Constraint::Fill(1),
                Constraint::Length(12),
                Constraint::Length(14),
                Constraint::Length(10),
            ],
        ),
        groups,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_deltas_over_the_interval() {
        let t0 = Instant::now();
        let mut before = Sample {
            at: t0,
            topics: BTreeMap::new(),
            groups: BTreeMap::new(),
        };
        before.topics.insert(
            "t".into(),
            TopicSample {
                partitions: 1,
                high_watermark: 100,
                records_fetched: 10,
                ..Default::default()
            },
        );
        before.groups.insert(
            "g".into(),
            GroupSample {
                topics: ["t".to_string()].into(),
                committed: 10,
                lag: 90,
            },
        );
        let mut now = before.clone();
        now.at = t0 + Duration::from_secs(2);
        let t = now.topics.get_mut("t").expect("topic t");
        t.high_watermark = 300;
        t.records_fetched = 50;
        let g = now.groups.get_mut("g").expect("group g");
        g.committed = 30;
        g.lag = 270;
        let v = view(&before, &now);
        assert_eq!(v.interval_ms, 2000);
        assert_eq!(v.topics[0].produce_per_sec, 100.0);
        assert_eq!(v.topics[0].fetch_per_sec, 20.0);
        assert_eq!(v.groups[0].lag, 270);
        assert_eq!(v.groups[0].lag_per_sec, 90.0);
        assert_eq!(v.groups[0].commit_per_sec, 10.0);
        // A counter that went back (the topic was recreated) gives no negative rate.
        assert_eq!(rate(5, 10, 1.0), 0.0);
    }
}
