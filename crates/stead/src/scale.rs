//! `stead scale`: an app's instance bounds, autoscaling targets and
//! traffic limits; and how `stead apps status` shows the autoscaler's view.

use std::time::Duration;

use clap::Args;
use stead_api::config::{fmt_ms, parse_duration_ms, parse_size};
use stead_api::{AppStatus, ScaleRequest, ScaleStatus};

use crate::api::Api;
use crate::ClientArgs;

/// A duration flag: `500ms`, `30s`, `5m`, `1h`, or seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_ms(s).map(Duration::from_millis)
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size(s)
}

#[derive(Args)]
pub struct ScaleArgs {
    pub app: String,
    /// Fewest instances (0 lets an idle app scale to zero).
    #[arg(long)]
    pub min: Option<u32>,
    /// Most instances.
    #[arg(long)]
    pub max: Option<u32>,
    /// Requests in flight per instance the autoscaler aims at.
    #[arg(long)]
    pub target_concurrency: Option<u32>,
    /// CPU per instance the autoscaler aims at, in percent of a core (0: ignore CPU).
    #[arg(long, value_name = "PERCENT")]
    pub target_cpu: Option<u32>,
    /// Scale to zero after this long without requests (with --min 0); 0 never does.
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Window over which demand is averaged.
    #[arg(long, value_parser = parse_duration)]
    pub stable_window: Option<Duration>,
    /// Short window over which bursts are detected.
    #[arg(long, value_parser = parse_duration)]
    pub panic_window: Option<Duration>,
    /// How long demand must stay lower before instances are removed.
    #[arg(long, value_parser = parse_duration)]
    pub scale_down_delay: Option<Duration>,
    /// Requests in flight per router above which requests get 503 (0: no limit).
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// Largest request body, e.g. 10MB (0: no limit).
    #[arg(long, value_parser = parse_bytes, value_name = "SIZE")]
    pub max_body: Option<u64>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn ms(d: Option<Duration>) -> Option<u64> {
    d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub async fn run(args: ScaleArgs) -> anyhow::Result<()> {
    let api = Api::from_args(&args.client)?;
    let req = ScaleRequest {
        min: args.min,
        max: args.max,
        target_concurrency: args.target_concurrency,
        target_cpu_percent: args.target_cpu,
        idle_timeout_ms: ms(args.idle_timeout),
        stable_window_ms: ms(args.stable_window),
        panic_window_ms: ms(args.panic_window),
        scale_down_delay_ms: ms(args.scale_down_delay),
        max_concurrency: args.max_concurrency,
        max_body_bytes: args.max_body,
    };
    let status: AppStatus = if req == ScaleRequest::default() {
        // Nothing to change: show the current scale.
        api.get(&format!("/v1/apps/{}", args.app)).await?
    } else {
        api.post(&format!("/v1/apps/{}/scale", args.app), &req)
            .await?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!(
        "{}: min {} max {}",
        status.name, status.scale.min, status.scale.max
    );
    if let Some(a) = &status.autoscale {
        print_scale(a);
    }
    Ok(())
}

/// The autoscaler's lines of `stead apps status` and `stead scale`.
pub fn print_scale(a: &ScaleStatus) {
    println!("autoscale: {}", a.reason);
    println!(
        "demand:    {} in-flight (burst {}), {} req/s, CPU {:.2} cores, {} queued workflows; {} of {} ready{}",
        a.in_flight,
        a.in_flight_burst,
        a.requests_per_s,
        a.cpu_cores,
        a.queued_workflows,
        a.ready,
        a.desired,
        if a.panic { "; panic mode" } else { "" }
    );
    if !a.in_flight_by_instance.is_empty() {
        let per: Vec<String> = a
            .in_flight_by_instance
            .iter()
            .map(|(i, n)| format!("{i} {n}"))
            .collect();
        println!("in flight: {}", per.join(", "));
    }
    let s = &a.settings;
    let mut limits = Vec::new();
    if s.max_concurrency > 0 {
        limits.push(format!("max {} in flight", s.max_concurrency));
    }
    if s.max_body_bytes > 0 {
        limits.push(format!("bodies up to {} bytes", s.max_body_bytes));
    }
    println!(
        "targets:   {} in-flight{} per instance; windows {}/{}; scale-down delay {}; {}{}",
        s.target_concurrency,
        if s.target_cpu_percent > 0 {
            format!(", {}% CPU", s.target_cpu_percent)
        } else {
            String::new()
        },
        fmt_ms(s.stable_window_ms),
        fmt_ms(s.panic_window_ms),
        fmt_ms(s.scale_down_delay_ms),
        if s.idle_timeout_ms == 0 {
            "never idles to zero".to_string()
        } else {
            format!("idle timeout {}", fmt_ms(s.idle_timeout_ms))
        },
        if limits.is_empty() {
            String::new()
        } else {
            format!("; {}", limits.join(", "))
        }
    );
}
