//! The chat-template sandbox's last resort, in a process of its own (the count of
//! stuck renders is process-wide, and the threads it leaves spin until exit).

use std::time::Duration;

use switchyard::generate::{ChatMessage, ChatTemplate, TemplateLimits, stuck_renders};

/// minijinja 3.1 materializes a lazy list doubled past 32 levels without charging
/// fuel, so neither fuel, the output cap nor the recursion limit stops this one.
const SPIN: &str = "{% set ns = namespace(l=[1]) %}{% for i in range(100) %}\
                    {% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}";

#[test]
fn renders_stuck_past_their_time_bound_are_bounded() {
    let limits = TemplateLimits {
        timeout: Duration::from_millis(300),
        max_stuck: 2,
        ..TemplateLimits::default()
    };
    let template = |source: &str| {
        ChatTemplate::new(source.into(), None, None)
            .unwrap()
            .with_limits(limits)
    };
    let (spin, quick) = (template(SPIN), template("{{ messages[0].content }}"));
    let messages = [ChatMessage::new("user", "hi")];
    assert_eq!(quick.render(&messages, false).unwrap(), "hi");
    assert_eq!(stuck_renders(), 0, "a render that finished is not counted");
    for n in 1..=2 {
        let err = spin.render(&messages, false).unwrap_err().to_string();
        assert!(err.contains("did not finish within 300ms"), "{err}");
        assert_eq!(stuck_renders(), n);
    }
    // Two threads spin: even a template that would finish at once is refused
    // instead of adding threads.
    let err = quick.render(&messages, false).unwrap_err().to_string();
    assert!(
        err.contains("2 earlier renders are still running past their time bound"),
        "{err}"
    );
}
