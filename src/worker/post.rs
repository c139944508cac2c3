//! Posting a tool result exactly once: retried while the lease holds, and after any failure
//! that may have taken effect, not posted again until the session shows it absent.

use std::time::{Duration, Instant};
use tokio::sync::watch;

use super::item::{End, Runner, LIST_LIMIT};
use super::lease::Lease;
use crate::control_plane::wire::{ContentBlock, ToolResultEvent, HISTORY_EVENT_TYPES};
use crate::control_plane::ApiError;
use crate::control_plane::Backoff;
use crate::tools::ToolResult;

/// The error result that stands in for one too large to post.
fn too_large(id: &str, size: usize, limit: usize) -> ToolResultEvent {
    ToolResultEvent::new(
        id,
        true,
        vec![ContentBlock::text(format!(
            "output too large: {size} bytes; limit {limit}. Narrow the call (a smaller range, a filter, head/tail) and try again."
        ))],
    )
}

impl Runner<'_> {
    /// Whether the session holds a result for `id`; None when that cannot be told now.
    async fn already_posted(&self, id: &str) -> Option<bool> {
        let mut page: Option<String> = None;
        loop {
            let l =
                self.client.list_events(self.session, page.as_deref(), LIST_LIMIT, HISTORY_EVENT_TYPES).await.ok()?;
            let mut found = false;
            let next = l
                .each(|e| {
                    found |= e.get("type").and_then(|t| t.as_str()) == Some("user.tool_result")
                        && e.get("tool_use_id").and_then(|t| t.as_str()) == Some(id)
                })
                .ok()?;
            if found {
                return Some(true);
            }
            match next {
                Some(p) => page = Some(p),
                None => return Some(false),
            }
        }
    }

    /// Posts a result exactly once: after any failure that may have taken effect — and, with
    /// `unsure`, before the first attempt — the session is checked for it, and nothing is posted
    /// again until the session shows it absent. Retried while the lease holds.
    pub(super) async fn post_result(
        &self,
        id: &str,
        name: Option<&str>,
        r: &ToolResult,
        lease: &watch::Receiver<Lease>,
        mut unsure: bool,
    ) -> Result<(), End> {
        let mut ev = ToolResultEvent::new(id, r.is_error, wire_blocks(r));
        let size = serde_json::to_vec(&ev).map(|v| v.len()).unwrap_or(usize::MAX);
        let mut shrunk = size > self.ctx.max_result_bytes;
        if shrunk {
            tracing::warn!(
                tool_use_id = id,
                size,
                limit = self.ctx.max_result_bytes,
                "a result over the limit becomes an error"
            );
            ev = too_large(id, size, self.ctx.max_result_bytes);
        }
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut permanent = 0;
        let mut lease = lease.clone();
        // Since when the session's events could not be read to tell whether the result landed.
        let mut blind_since: Option<Instant> = None;
        loop {
            match *lease.borrow() {
                Lease::Lost => return Err(End::Lost),
                // A forced stop ends the item now; the heartbeat no longer runs, so nothing else
                // would end this loop.
                Lease::ForceRequested => return Err(End::Stopped { forced: true }),
                Lease::Held | Lease::StopRequested => {}
            }
            let err = if unsure {
                match self.already_posted(id).await {
                    Some(true) => {
                        tracing::info!(tool_use_id = id, "the result had been recorded already");
                        break;
                    }
                    Some(false) => {
                        unsure = false;
                        blind_since = None;
                        continue;
                    }
                    // Still never posted again without looking: after a whole lease of not being
                    // able to look, the item ends instead of holding its slot.
                    None if blind_since.get_or_insert_with(Instant::now).elapsed() > self.ttl() => {
                        return Err(End::Failed(format!(
                            "could not tell whether the result of {id} was recorded: the session's events could \
                             not be read for a whole lease"
                        )));
                    }
                    None => None,
                }
            } else {
                if !self.confirm_lease(&lease).await {
                    tracing::warn!(tool_use_id = id, "the lease is no longer this worker's; the result is dropped");
                    self.ctx.state.take_outbox(self.dirs, id);
                    return Err(End::Lost);
                }
                match self.client.send_event(self.session, &ev).await {
                    Ok(()) => break,
                    // The API refuses the result (400, 413): the call stays open, so it gets an
                    // error result saying so, in the official runner's words, and the session
                    // goes on.
                    Err(ApiError::Rejected { status: status @ (400 | 413), message }) if !shrunk => {
                        tracing::warn!(tool_use_id = id, size, status, "the control plane refused a result");
                        let tool = crate::tools::pyfmt::repr(name.unwrap_or("unknown"));
                        let text = format!("The API refused the result of tool {tool}: {message}");
                        ev = ToolResultEvent::new(id, true, vec![ContentBlock::text(text)]);
                        shrunk = true;
                        continue;
                    }
                    Err(e) => {
                        // Only a 429 or a refusal certainly did nothing; anything else may have
                        // landed, so the next step is to look, not to post.
                        unsure = e.is_ambiguous();
                        if matches!(e, ApiError::Rejected { .. } | ApiError::NotFound(_) | ApiError::Auth { .. }) {
                            permanent += 1;
                            if permanent >= 3 {
                                return Err(End::Failed(format!("the control plane refuses the result of {id}: {e}")));
                            }
                        }
                        Some(e)
                    }
                }
            };
            self.ctx.metrics.result_post_retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let d = match &err {
                // A POST that may still be on its way (a timeout, a cut connection) is given one
                // more request timeout to land before the session is looked at: a result found
                // absent too early would be posted twice.
                Some(e @ (ApiError::Timeout(_) | ApiError::Connect(_))) => {
                    backoff.delay_for(e).max(self.client.timeout)
                }
                Some(e) => backoff.delay_for(e),
                None => backoff.next_delay(),
            };
            match &err {
                Some(e) => {
                    tracing::warn!(tool_use_id = id, error = %e, retry_ms = d.as_millis() as u64, "posting a result failed")
                }
                None => tracing::warn!(
                    tool_use_id = id,
                    retry_ms = d.as_millis() as u64,
                    "cannot tell whether a result was posted; looking again"
                ),
            }
            tokio::select! {
                () = tokio::time::sleep(d) => {}
                r = lease.changed() => if r.is_err() { tokio::time::sleep(d).await },
            }
        }
        self.ctx.state.take_outbox(self.dirs, id);
        Ok(())
    }
}

/// A tool result's blocks as the Sessions API takes them.
fn wire_blocks(r: &ToolResult) -> Vec<ContentBlock> {
    use crate::tools::Block;
    r.content
        .iter()
        .map(|b| match b {
            Block::Text { text } => ContentBlock::text(text.clone()),
            Block::Image { source } => ContentBlock::Image { source: serde_json::to_value(source).unwrap_or_default() },
            Block::Document { source } => {
                ContentBlock::Document { source: serde_json::to_value(source).unwrap_or_default() }
            }
        })
        .collect()
}
