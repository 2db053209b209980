//! Where a cold start's time goes: when each step of an environment's
//! start ended, and then its first event's delivery and answer, from the
//! moment the Invoke handler began. The worker logs the trace of every
//! invocation that meets a new environment (target `cold_start`, level
//! info), and `invoke_bench` prints the medians of each step.

use std::time::Instant;

/// The steps' end times, in order.
#[derive(Debug, Clone, Default)]
pub struct StartTrace {
    steps: Vec<(&'static str, Instant)>,
}

impl StartTrace {
    /// Step `name` ended now.
    pub fn mark(&mut self, name: &'static str) {
        self.mark_at(name, Instant::now());
    }

    /// Step `name` ended at `at`.
    pub fn mark_at(&mut self, name: &'static str, at: Instant) {
        self.steps.push((name, at));
    }

    /// `name ms, name ms, ...`: each step's end in milliseconds after
    /// `origin`, in the order they ended.
    pub fn line(&self, origin: Instant) -> String {
        let mut steps = self.steps.clone();
        steps.sort_by_key(|(_, at)| *at);
        steps
            .iter()
            .map(|(name, at)| {
                let ms = at.saturating_duration_since(origin).as_secs_f64() * 1e3;
                format!("{name} {ms:.3}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn steps_read_in_the_order_they_ended_as_milliseconds_after_the_origin() {
        let origin = Instant::now();
        let mut trace = StartTrace::default();
        trace.mark_at("second", origin + Duration::from_micros(2_500));
        trace.mark_at("first", origin + Duration::from_micros(1_250));
        assert_eq!(trace.line(origin), "first 1.250, second 2.500");
    }
}
