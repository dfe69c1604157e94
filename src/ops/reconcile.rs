//! Reconciliation: pages through the provider's event list and stores in
//! the inbox whatever it lacks, so a webhook that never arrived is applied
//! anyway. Events fetched from the API are authentic (the call is
//! authenticated); they are stored with `source = 'reconcile'`.

use crate::providers::stripe::{StripeClient, StripeClientError};
use crate::store::provider_events::Stored;
use crate::store::Store;
use crate::webhooks::parse_stripe_event;

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileReport {
    pub seen: usize,
    pub ingested: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Stripe(#[from] StripeClientError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

pub async fn reconcile_stripe(
    store: &Store,
    client: &StripeClient,
    since: i64,
) -> Result<ReconcileReport, ReconcileError> {
    let mut report = ReconcileReport::default();
    let mut after: Option<String> = None;
    loop {
        let (events, has_more) = client.list_events(since, after.as_deref()).await?;
        let mut batch = Vec::new();
        for event in &events {
            report.seen += 1;
            let id = event["id"].as_str().unwrap_or_default();
            if store.find_provider_event("stripe", id).await?.is_some() {
                continue;
            }
            let body = serde_json::to_vec(event).unwrap_or_default();
            match parse_stripe_event(&body) {
                Ok(mut parsed) => {
                    parsed.source = "reconcile";
                    batch.push(parsed);
                }
                Err(reason) => tracing::warn!(event = id, %reason, "skipping an event the provider listed"),
            }
        }
        if !batch.is_empty() {
            let outcomes = store.insert_provider_events(&batch).await?;
            report.ingested += outcomes.iter().filter(|o| **o == Stored::New).count();
        }
        match (has_more, events.last().and_then(|e| e["id"].as_str())) {
            (true, Some(last)) => after = Some(last.to_owned()),
            _ => break,
        }
    }
    metrics::counter!("reconcile_ingested_total", "provider" => "stripe").increment(report.ingested as u64);
    Ok(report)
}

/// Parses `3d`, `12h`, `30m` or `45s` into seconds.
pub fn parse_window(raw: &str) -> Option<i64> {
    let (number, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = number.parse().ok()?;
    let seconds = match unit {
        "d" => n.checked_mul(86_400)?,
        "h" => n.checked_mul(3600)?,
        "m" => n.checked_mul(60)?,
        "s" => n,
        _ => return None,
    };
    (seconds > 0).then_some(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("3d"), Some(259_200));
        assert_eq!(parse_window("12h"), Some(43_200));
        assert_eq!(parse_window("30m"), Some(1800));
        assert_eq!(parse_window("3"), None);
        assert_eq!(parse_window("d"), None);
        assert_eq!(parse_window("0d"), None);
        assert_eq!(parse_window("3w"), None);
        assert_eq!(parse_window("99999999999999999999d"), None);
    }
}
