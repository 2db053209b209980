//! Registering a subscriber's file descriptors with the event loop.
//!
//! `MutEventSubscriber::init` cannot fail, but a microVM whose device or
//! socket the event loop does not hear from hangs its guest or its host
//! (a worker once waited forever on a control socket nobody watched). So
//! a failed registration is kept, on the registering thread, for the
//! microVM's run loop to turn into an error.

use std::cell::RefCell;

use event_manager::{EventOps, Events};

thread_local! {
    static FAILURES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Watches `events`; `what` names them in the error if that fails.
pub fn watch(ops: &mut EventOps, events: Events, what: &str) {
    if let Err(e) = ops.add(events) {
        record_failure(format!("cannot watch {what}: {e:?}"));
    }
}

/// Keeps a failure of a subscriber's set-up that has no error to return.
pub fn record_failure(failure: String) {
    FAILURES.with(|f| f.borrow_mut().push(failure));
}

/// The registrations that failed on this thread since the last call.
pub fn take_failures() -> Vec<String> {
    FAILURES.with(|f| std::mem::take(&mut *f.borrow_mut()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, EventSet, MutEventSubscriber, SubscriberOps};
    use std::sync::{Arc, Mutex};

    struct Watcher(std::fs::File);

    impl MutEventSubscriber for Watcher {
        fn process(&mut self, _: Events, _: &mut EventOps) {}

        fn init(&mut self, ops: &mut EventOps) {
            watch(ops, Events::new(&self.0, EventSet::IN), "a regular file");
        }
    }

    #[test]
    fn a_failed_registration_is_reported_once() {
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        // epoll refuses regular files.
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(Watcher(file))));
        let failures = take_failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].starts_with("cannot watch a regular file: "),
            "{failures:?}"
        );
        assert!(take_failures().is_empty());
    }
}
