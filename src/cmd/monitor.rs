//! `axion monitor`: what is running, what is stuck and what died, at a glance.
//!
//! A live terminal dashboard (ratatui) over the retained heartbeat mesh and
//! the retained queue stats, or with `--once` a single snapshot for scripts
//! (`--json`: an array of heartbeat records plus `state`, `topic`,
//! `age_secs`, and `alarm` on the rows of a service with an active alarm). All the state logic lives in `axion_client::fleet`; this
//! file only renders it.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use axion_client::fleet::{Counts, FleetWatcher, InstanceView, State, WatchOptions};
use axion_wire::schema::{now_unix, DEFAULT_STALE_SECS};
use axion_wire::{BrokerUrls, DEFAULT_MQTT_URL};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, Wrap};
use ratatui::{DefaultTerminal, Frame};
use serde_json::Value;

/// How long to wait for the broker's SUBACK before giving up.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The retained burst is over once no retained record came for this long.
const SETTLE_QUIET: Duration = Duration::from_millis(100);
/// Screen refresh when nothing is pressed (ages tick even without messages).
const REFRESH: Duration = Duration::from_millis(250);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Broker URL, mqtt://[user[:password]@]host[:port]; the nodes of a clustered broker comma-separated (mqtt://a:1883,mqtt://b:1883), failed over in turn.
    #[arg(long, env = "AXION_MQTT_URL", default_value = DEFAULT_MQTT_URL)]
    pub mqtt: BrokerUrls,
    /// Show one package only (default: all).
    #[arg(long, env = "AXION_MONITOR_PACKAGE")]
    pub package: Option<String>,
    /// Show one service only (default: all).
    #[arg(long, env = "AXION_MONITOR_SERVICE")]
    pub service: Option<String>,
    /// Print one snapshot and exit instead of running the dashboard.
    #[arg(long, env = "AXION_MONITOR_ONCE")]
    pub once: bool,
    /// With --once: print a JSON array instead of a text table.
    #[arg(long, env = "AXION_MONITOR_JSON", requires = "once")]
    pub json: bool,
    /// With --once: wait at least this long after SUBACK for retained records.
    #[arg(long, env = "AXION_MONITOR_SETTLE_MS", default_value_t = 500)]
    pub settle_ms: u64,
    /// An instance whose last record is older than this is stale.
    #[arg(long, env = "HEARTBEAT_STALE_SECS", default_value_t = DEFAULT_STALE_SECS)]
    pub stale_secs: u64,
    /// Initial sort within each package/service group (key `s` cycles it).
    #[arg(long, env = "AXION_MONITOR_SORT", value_enum, default_value_t = SortKey::Instance)]
    pub sort: SortKey,
}

/// Sort keys of the dashboard, in the order `s` cycles through them.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Instance,
    State,
    Age,
    Uptime,
    Queue,
}

impl SortKey {
    fn next(self) -> Self {
        match self {
            SortKey::Instance => SortKey::State,
            SortKey::State => SortKey::Age,
            SortKey::Age => SortKey::Uptime,
            SortKey::Uptime => SortKey::Queue,
            SortKey::Queue => SortKey::Instance,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SortKey::Instance => "instance",
            SortKey::State => "state",
            SortKey::Age => "age",
            SortKey::Uptime => "uptime",
            SortKey::Queue => "queue depth",
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let options = WatchOptions {
        package: args.package.clone(),
        service: args.service.clone(),
        queues: !args.once,
        alarms: true,
        client_prefix: "monitor",
        stale_after: Duration::from_secs(args.stale_secs),
        announce: true,
    };
    let broker = args.mqtt.clone().with_env_credentials();
    let watcher = {
        let _guard = runtime.enter();
        FleetWatcher::start(&broker, options)?
    };
    if args.once {
        runtime.block_on(async {
            watcher
                .wait_subscribed(SUBSCRIBE_TIMEOUT)
                .await
                .with_context(|| format!("subscribe to heartbeats on {broker}"))?;
            let settle = Duration::from_millis(args.settle_ms);
            watcher
                .settle(settle, SETTLE_QUIET, settle * 4 + Duration::from_secs(1))
                .await;
            anyhow::Ok(())
        })?;
        let mut rows = watcher.views(now_unix());
        sort_rows(&mut rows, args.sort, false);
        let text = render_once(&rows, &watcher.alarms(), args.json)?;
        runtime.block_on(watcher.stop());
        match std::io::stdout().lock().write_all(text.as_bytes()) {
            // `axion monitor --once | head` closes the pipe early: not an error.
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {}
            written => written.context("write the table")?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut terminal = ratatui::init();
    let result = dashboard(&mut terminal, &watcher, &broker, &args);
    ratatui::restore();
    runtime.block_on(watcher.stop());
    result.map(|()| ExitCode::SUCCESS)
}

/// The `--once` output: the table (and broker counters), or JSON.
fn render_once(
    rows: &[InstanceView],
    alarms: &[(String, Value)],
    json: bool,
) -> anyhow::Result<String> {
    if json {
        return Ok(serde_json::to_string_pretty(rows).context("encode JSON")? + "\n");
    }
    let mut out = String::new();
    writeln!(
        out,
        "{:<12} {:<16} {:<28} {:<9} {:>7} {:>8} {:>8} {:>6} {:>8}",
        "PACKAGE", "SERVICE", "INSTANCE", "STATE", "AGE", "UPTIME", "PID", "QUEUE", "INFLIGHT"
    )?;
    for r in rows {
        let h = &r.record;
        let state = match (&h.reason, r.state) {
            (Some(reason), State::Offline) => format!("offline/{reason}"),
            _ => r.state.as_str().to_string(),
        };
        writeln!(
            out,
            "{:<12} {:<16} {:<28} {:<9} {:>7} {:>8} {:>8} {:>6} {:>8}",
            h.package,
            h.service,
            h.instance_id,
            state,
            fmt_secs(r.age_secs),
            fmt_secs(h.uptime_seconds as f64),
            h.pid,
            h.queue_depth,
            h.inflight
        )?;
    }
    for (instance, line) in broker_counters(rows) {
        writeln!(out, "broker {instance}: {line}")?;
    }
    for (topic, alarm) in alarms {
        writeln!(out, "ALARM {}", alarm_line(topic, alarm))?;
    }
    Ok(out)
}

/// One alarm in words: which service, what happened, what to do.
fn alarm_line(topic: &str, alarm: &Value) -> String {
    let field = |k: &str| alarm.get(k).and_then(Value::as_str).unwrap_or("");
    let service = axion_wire::topics::parse_alarm(topic)
        .map(|(pkg, svc)| format!("{pkg}/{svc}"))
        .unwrap_or_else(|| topic.to_string());
    match alarm.get("restarts").and_then(Value::as_u64) {
        Some(n) => format!(
            "{service} on {}: {n} restarts in {}s; {}",
            field("host"),
            alarm
                .get("window_secs")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            field("hint")
        ),
        None => format!("{service}: {alarm}"),
    }
}

/// The counters an Axion broker puts on its heartbeat record (`"broker"`),
/// one line per broker instance shown: refusals, slow consumers cut off
/// and router renewals are what an operator looks for when clients
/// complain.
fn broker_counters(rows: &[InstanceView]) -> Vec<(String, String)> {
    let fields = [
        ("sessions", "sessions"),
        ("refused_at_limit", "refused at limit"),
        ("slow_consumers_cut_off", "slow consumers cut off"),
        ("sessions_expired", "sessions expired"),
        ("auth_refused_connects", "logins refused"),
        ("auth_throttled_logins", "logins throttled"),
        ("acl_denied_publishes", "publishes denied"),
        ("acl_denied_subscribes", "subscribes denied"),
        ("filters_refused_per_client", "filters refused per client"),
        ("router_renewals", "router renewals"),
        ("router_renewals_put_off", "put off"),
        ("router_renewal_pause_ms", "last pause ms"),
        ("share_repeats_dropped", "$share repeats dropped"),
        ("queued_messages", "queued for away sessions"),
        ("queued_dropped", "queue drops"),
    ];
    rows.iter()
        .filter(|r| r.state != State::Offline)
        .filter_map(|r| {
            let counters = r.record.extras.get("broker")?.as_object()?;
            let mut line = fields
                .iter()
                .filter_map(|(key, label)| {
                    let n = counters.get(*key)?.as_u64()?;
                    Some(format!("{label} {n}"))
                })
                .collect::<Vec<_>>()
                .join(" · ");
            // Which away sessions lost messages at their queue's bound.
            if let Some(by_client) = counters
                .get("queue_drops_by_client")
                .and_then(Value::as_object)
                .filter(|m| !m.is_empty())
            {
                let clients: Vec<String> = by_client
                    .iter()
                    .map(|(client, n)| format!("{client} {n}"))
                    .collect();
                line.push_str(&format!(" ({})", clients.join(", ")));
            }
            Some((r.record.instance_id.clone(), line))
        })
        .collect()
}

/// Groups by package and service, then orders each group by `key`.
fn sort_rows(rows: &mut [InstanceView], key: SortKey, reverse: bool) {
    rows.sort_by(|a, b| {
        let group = (group_of(a)).cmp(&group_of(b));
        let within = match key {
            SortKey::Instance => Ordering::Equal,
            SortKey::State => a.state.cmp(&b.state),
            SortKey::Age => a.age_secs.total_cmp(&b.age_secs),
            SortKey::Uptime => b.record.uptime_seconds.cmp(&a.record.uptime_seconds),
            SortKey::Queue => b.record.queue_depth.cmp(&a.record.queue_depth),
        };
        let within = within.then_with(|| a.topic.cmp(&b.topic));
        group.then(if reverse { within.reverse() } else { within })
    });
}

/// The package and service as named by the topic (the record may omit them).
fn group_of(v: &InstanceView) -> (&str, &str) {
    match axion_client::fleet::parse_heartbeat_topic(&v.topic) {
        Some((pkg, svc, _)) => (pkg, svc),
        None => (v.record.package.as_str(), v.record.service.as_str()),
    }
}

fn fmt_secs(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn dashboard(
    terminal: &mut DefaultTerminal,
    watcher: &FleetWatcher,
    broker: &BrokerUrls,
    args: &Args,
) -> anyhow::Result<()> {
    let mut sort = args.sort;
    let mut reverse = false;
    loop {
        let now = now_unix();
        let mut rows = watcher.views(now);
        sort_rows(&mut rows, sort, reverse);
        let counts = watcher.counts(now);
        let queues = watcher.queue_stats();
        let alarms = watcher.alarms();
        let view = View {
            broker,
            args,
            rows: &rows,
            counts,
            queues: &queues,
            alarms: &alarms,
            sort,
            reverse,
            now,
        };
        terminal
            .draw(|f| view.draw(f))
            .context("draw the dashboard")?;
        if event::poll(REFRESH).context("read the terminal")? {
            if let Event::Key(key) = event::read().context("read the terminal")? {
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(())
                    }
                    KeyCode::Char('s') => sort = sort.next(),
                    KeyCode::Char('r') => reverse = !reverse,
                    _ => {}
                }
            }
        }
    }
}

struct View<'a> {
    broker: &'a BrokerUrls,
    args: &'a Args,
    rows: &'a [InstanceView],
    counts: Counts,
    queues: &'a [(String, Value)],
    alarms: &'a [(String, Value)],
    sort: SortKey,
    reverse: bool,
    now: f64,
}

fn state_style(state: State) -> Style {
    match state {
        State::Online => Style::new().fg(Color::Green).add_modifier(Modifier::BOLD),
        State::Draining => Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        State::Stale => Style::new().fg(Color::Magenta),
        State::Offline => Style::new().fg(Color::Red),
    }
}

impl View<'_> {
    fn draw(&self, frame: &mut Frame) {
        let queue_height = if self.queues.is_empty() {
            0
        } else {
            (self.queues.len() as u16 + 3).min(12)
        };
        let brokers = broker_counters(self.rows);
        let broker_height = if brokers.is_empty() {
            0
        } else {
            // Two lines each: the counters wrap on a narrow terminal.
            (brokers.len() as u16 * 2 + 1).min(9)
        };
        let alarm_height = if self.alarms.is_empty() {
            0
        } else {
            (self.alarms.len() as u16 * 2 + 1).min(7)
        };
        let [header, alarms, instances, queues, broker, footer] = Layout::vertical([
            Constraint::Length(2),
            Constraint::Length(alarm_height),
            Constraint::Min(4),
            Constraint::Length(queue_height),
            Constraint::Length(broker_height),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(self.header(), header);
        if alarm_height > 0 {
            let lines = self
                .alarms
                .iter()
                .map(|(topic, alarm)| {
                    Line::styled(
                        alarm_line(topic, alarm),
                        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
                    )
                })
                .collect::<Vec<_>>();
            frame.render_widget(
                Paragraph::new(lines)
                    .wrap(Wrap { trim: true })
                    .block(Block::new().borders(Borders::TOP).title(" alarms ")),
                alarms,
            );
        }
        frame.render_widget(self.instances(), instances);
        if queue_height > 0 {
            frame.render_widget(self.queue_table(), queues);
        }
        if broker_height > 0 {
            let lines = brokers
                .into_iter()
                .map(|(instance, line)| {
                    Line::from(vec![
                        Span::styled(instance, Style::new().add_modifier(Modifier::BOLD)),
                        Span::raw(format!("  {line}")),
                    ])
                })
                .collect::<Vec<_>>();
            frame.render_widget(
                Paragraph::new(lines)
                    .wrap(Wrap { trim: true })
                    .block(Block::new().borders(Borders::TOP).title(" brokers ")),
                broker,
            );
        }
        frame.render_widget(
            Paragraph::new(Line::from(vec![
                Span::styled(" q", Style::new().add_modifier(Modifier::BOLD)),
                Span::raw(" quit  "),
                Span::styled("s", Style::new().add_modifier(Modifier::BOLD)),
                Span::raw(" sort  "),
                Span::styled("r", Style::new().add_modifier(Modifier::BOLD)),
                Span::raw(" reverse"),
            ]))
            .style(Style::new().fg(Color::DarkGray)),
            footer,
        );
    }

    fn header(&self) -> Paragraph<'static> {
        let c = self.counts;
        let filter = match (&self.args.package, &self.args.service) {
            (None, None) => "all".to_string(),
            (p, s) => format!(
                "package {} service {}",
                p.as_deref().unwrap_or("*"),
                s.as_deref().unwrap_or("*")
            ),
        };
        Paragraph::new(vec![
            Line::from(vec![
                Span::styled("axion monitor", Style::new().add_modifier(Modifier::BOLD)),
                Span::raw(format!(
                    "  {}  filter: {filter}  sort: {}{}",
                    self.broker,
                    self.sort.name(),
                    if self.reverse { " (reversed)" } else { "" }
                )),
            ]),
            Line::from(vec![
                Span::raw(format!("{} instances: ", self.rows.len())),
                Span::styled(format!("{} online", c.online), state_style(State::Online)),
                Span::raw("  "),
                Span::styled(
                    format!("{} draining", c.draining),
                    state_style(State::Draining),
                ),
                Span::raw("  "),
                Span::styled(format!("{} stale", c.stale), state_style(State::Stale)),
                Span::raw("  "),
                Span::styled(
                    format!("{} offline", c.offline),
                    state_style(State::Offline),
                ),
            ]),
        ])
    }

    fn instances(&self) -> Table<'static> {
        let mut last_group: Option<(String, String)> = None;
        let rows = self.rows.iter().map(|v| {
            let h = &v.record;
            let (pkg, svc) = group_of(v);
            let group = (pkg.to_string(), svc.to_string());
            let first_of_group = last_group.as_ref() != Some(&group);
            last_group = Some(group);
            let dim = matches!(v.state, State::Stale | State::Offline);
            let state = match (&h.reason, v.state) {
                (Some(reason), State::Offline) => format!("offline/{reason}"),
                _ => v.state.as_str().to_string(),
            };
            let progress = h
                .last_progress_ts
                .map(|ts| format!("{} ago", fmt_secs(self.now - ts)))
                .unwrap_or_else(|| "-".into());
            let avg = h
                .avg_job_ms
                .map(|ms| format!("{ms:.0}"))
                .unwrap_or_else(|| "-".into());
            let cells = vec![
                Cell::from(if first_of_group {
                    pkg.to_string()
                } else {
                    String::new()
                }),
                Cell::from(if first_of_group {
                    svc.to_string()
                } else {
                    String::new()
                }),
                Cell::from(h.instance_id.clone()),
                Cell::from(state).style(state_style(v.state)),
                Cell::from(fmt_secs(v.age_secs)),
                Cell::from(fmt_secs(h.uptime_seconds as f64)),
                Cell::from(h.pid.to_string()),
                Cell::from(h.queue_depth.to_string()),
                Cell::from(h.inflight.to_string()),
                Cell::from(progress),
                Cell::from(avg),
                Cell::from(if h.connected { "yes" } else { "NO" }),
            ];
            let row = Row::new(cells);
            if dim {
                row.style(Style::new().fg(Color::DarkGray))
            } else {
                row
            }
        });
        let header = Row::new([
            "PACKAGE",
            "SERVICE",
            "INSTANCE",
            "STATE",
            "AGE",
            "UPTIME",
            "PID",
            "QUEUE",
            "INFLIGHT",
            "LAST PROGRESS",
            "AVG MS",
            "CONN",
        ])
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
        Table::new(
            rows.collect::<Vec<_>>(),
            [
                Constraint::Length(12),
                Constraint::Length(14),
                Constraint::Min(16),
                Constraint::Length(15),
                Constraint::Length(7),
                Constraint::Length(7),
                Constraint::Length(8),
                Constraint::Length(6),
                Constraint::Length(8),
                Constraint::Length(13),
                Constraint::Length(7),
                Constraint::Length(4),
            ],
        )
        .header(header)
        .block(Block::new().borders(Borders::TOP).title(" instances "))
    }

    fn queue_table(&self) -> Table<'static> {
        let num = |v: &Value, k: &str| {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into())
        };
        let rows = self.queues.iter().map(|(topic, v)| {
            let pkg = topic.split('/').nth(1).unwrap_or_default().to_string();
            let name = v
                .get("queue")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| topic.split('/').nth(3).unwrap_or_default().to_string());
            let oldest = v
                .get("oldest_age_ms")
                .and_then(Value::as_f64)
                .map(|ms| fmt_secs(ms / 1000.0))
                .unwrap_or_else(|| "-".into());
            Row::new(vec![
                pkg,
                name,
                num(v, "depth"),
                num(v, "inflight"),
                num(v, "dead"),
                num(v, "enqueued_total"),
                num(v, "acked_total"),
                num(v, "failed_total"),
                oldest,
            ])
        });
        let header = Row::new([
            "PACKAGE", "QUEUE", "DEPTH", "INFLIGHT", "DEAD", "ENQUEUED", "ACKED", "FAILED",
            "OLDEST",
        ])
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
        Table::new(
            rows.collect::<Vec<_>>(),
            [
                Constraint::Length(12),
                Constraint::Min(16),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(6),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Length(8),
                Constraint::Length(8),
            ],
        )
        .header(header)
        .block(Block::new().borders(Borders::TOP).title(" queues "))
    }
}

#[cfg(test)]
mod tests {
    use super::fmt_secs;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(fmt_secs(5.2), "5s");
        assert_eq!(fmt_secs(125.0), "2m05s");
        assert_eq!(fmt_secs(3720.0), "1h02m");
        assert_eq!(fmt_secs(90_000.0), "1d01h");
    }
}
