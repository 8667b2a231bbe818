//! `drover stats [--json]`: one look at the system — runs by state, the oldest queued run,
//! dead letters, the fleet's slots, the outbox backlog and each pool's queue depth.

use drover_proto::v1 as pb;
use serde_json::{Value, json};

use crate::client::{self, AdminClient, Subject};
use crate::render;

pub async fn run(admin: &mut AdminClient, as_json: bool) -> anyhow::Result<()> {
    let s = admin
        .get_stats(pb::GetStatsRequest {})
        .await
        .map_err(|st| client::failed("cannot read stats", Subject::Other, &st))?
        .into_inner();
    if as_json {
        println!("{}", stats_json(&s));
    } else {
        print!("{}", stats_text(&s));
    }
    Ok(())
}

pub fn stats_json(s: &pb::GetStatsResponse) -> Value {
    let runs: serde_json::Map<String, Value> = s
        .runs_by_state
        .iter()
        .map(|c| (render::state_name(c.state), json!(c.count)))
        .collect();
    json!({
        "runs": runs,
        "oldest_queued": if s.oldest_queued_run_id.is_empty() {
            Value::Null
        } else {
            json!({"run_id": s.oldest_queued_run_id, "age_seconds": s.oldest_queued_age_seconds})
        },
        "dead_letters": s.dead_letters,
        "agents": {
            "live": s.agents_live,
            "draining": s.agents_draining,
            "capacity": s.capacity,
            "running": s.running,
        },
        "outbox": {"backlog": s.outbox_backlog, "oldest_age_seconds": s.outbox_oldest_age_seconds},
        "queues": s.queues.iter().map(|q| json!({
            "pool": q.pool, "queue": q.queue, "messages": q.messages, "consumers": q.consumers,
        })).collect::<Vec<_>>(),
        "queues_error": if s.queues_error.is_empty() { Value::Null } else { json!(s.queues_error) },
    })
}

pub fn stats_text(s: &pb::GetStatsResponse) -> String {
    let mut out = String::new();
    let rows: Vec<Vec<String>> = s
        .runs_by_state
        .iter()
        .map(|c| vec![render::state_name(c.state), c.count.to_string()])
        .collect();
    out.push_str(&render::table(&["STATE", "RUNS"], &rows));
    if s.oldest_queued_run_id.is_empty() {
        out.push_str("oldest queued: none\n");
    } else {
        out.push_str(&format!(
            "oldest queued: {} (queued {:.1} s)\n",
            s.oldest_queued_run_id, s.oldest_queued_age_seconds
        ));
    }
    out.push_str(&format!("dead letters: {}\n", s.dead_letters));
    out.push_str(&format!(
        "agents: {} live, {} draining; slots {}/{} in use\n",
        s.agents_live, s.agents_draining, s.running, s.capacity
    ));
    out.push_str(&format!(
        "outbox: {} pending, oldest {:.1} s\n",
        s.outbox_backlog, s.outbox_oldest_age_seconds
    ));
    if !s.queues.is_empty() {
        let rows: Vec<Vec<String>> = s
            .queues
            .iter()
            .map(|q| {
                vec![
                    q.pool.clone(),
                    q.queue.clone(),
                    q.messages.to_string(),
                    q.consumers.to_string(),
                ]
            })
            .collect();
        out.push_str(&render::table(
            &["POOL", "QUEUE", "READY", "CONSUMERS"],
            &rows,
        ));
    }
    if !s.queues_error.is_empty() {
        out.push_str(&format!("queue depths unavailable: {}\n", s.queues_error));
    }
    out
}
