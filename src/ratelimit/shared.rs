//! Limits shared by every instance through Redis: one Lua script runs the
//! GCRA atomically (one round trip, `EVALSHA`), on Redis's clock so
//! instances with skewed clocks agree, and keys expire once their bucket
//! is full again.
//!
//! Redis must never stall or break the API: each check waits at most the
//! configured timeout, and a failure opens a circuit for a second, during
//! which checks go straight to the local limiter; one check then probes
//! Redis again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use super::{Decision, Policy, Scope};

/// How long checks stay local after Redis failed, before one probes again.
const OPEN_FOR: Duration = Duration::from_secs(1);

/// GCRA on the theoretical arrival time (TAT), in microseconds of Redis's
/// clock. Returns `{allowed, remaining, retry_after_us, reset_after_us}`.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
"#;

pub struct SharedStore {
    client: redis::Client,
    connection: Mutex<Option<MultiplexedConnection>>,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` until which the circuit is open; 0: closed.
    open_until: AtomicU64,
}

impl SharedStore {
    pub fn new(client: redis::Client, prefix: &str, timeout: Duration) -> Self {
        SharedStore {
            client,
            connection: Mutex::new(None),
            script: redis::Script::new(GCRA),
            prefix: format!("{prefix}ratelimit:"),
            timeout: timeout.max(Duration::from_millis(1)),
            epoch: Instant::now(),
            open_until: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 keeps 0 free to mean "closed".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The shared decision, or why there is none (the fallback's reason label).
    pub async fn check(&self, scope: Scope, id: &str, policy: Policy) -> Result<Decision, &'static str> {
        let open_until = self.open_until.load(Ordering::Acquire);
        let probing = open_until != 0;
        if probing {
            let now = self.now_ms();
            // Open: stay local. Just expired: one caller probes, the others stay local.
            if now < open_until
                || self
                    .open_until
                    .compare_exchange(
                        open_until,
                        now + OPEN_FOR.as_millis() as u64,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_err()
            {
                return Err("circuit_open");
            }
        }
        let key = format!("{}{}:{id}", self.prefix, scope.as_str());
        match tokio::time::timeout(self.timeout, self.run(&key, policy)).await {
            Ok(Ok(decision)) => {
                if probing {
                    self.open_until.store(0, Ordering::Release);
                    tracing::info!("redis answers again: rate limits are shared across instances again");
                }
                Ok(decision)
            }
            Ok(Err(e)) => {
                self.trip(&e.to_string());
                Err("error")
            }
            Err(_) => {
                self.trip(&format!("no answer within {} ms", self.timeout.as_millis()));
                Err("timeout")
            }
        }
    }

    async fn run(&self, key: &str, policy: Policy) -> redis::RedisResult<Decision> {
        let mut connection = self.connection().await?;
        let interval_us = (policy.interval.as_micros() as u64).max(1);
        let (allowed, remaining, retry_us, reset_us): (i64, i64, i64, i64) = self
            .script
            .key(key)
            .arg(interval_us)
            .arg(policy.burst.get())
            .invoke_async(&mut connection)
            .await?;
        let micros = |us: i64| Duration::from_micros(us.max(0) as u64);
        Ok(Decision {
            allowed: allowed == 1,
            limit: policy.burst.get(),
            remaining: remaining.clamp(0, i64::from(policy.burst.get())) as u32,
            retry_after: micros(retry_us),
            reset_after: micros(reset_us),
        })
    }

    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(c) = self.connection.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(c);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        let c = self.client.get_multiplexed_async_connection_with_config(&config).await?;
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    /// Opens the circuit and drops the connection, so the probe reconnects.
    /// Logged once per outage, not once per request.
    fn trip(&self, cause: &str) {
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let previous = self.open_until.swap(self.now_ms() + OPEN_FOR.as_millis() as u64, Ordering::AcqRel);
        if previous == 0 {
            tracing::warn!(
                error = %cause,
                "redis unavailable for rate limits: each instance now limits on its own until it answers"
            );
        }
    }
}
