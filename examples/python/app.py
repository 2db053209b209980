"""A python3.11 handler: Lambda's event and context, run by the official
awslambdaric in the worker's Python runtime image."""
import platform


def handler(event, context):
    print(f"hello from {platform.python_implementation()} {platform.python_version()}")
    return {
        "greeting": f"hello, {event.get('name', 'world')}",
        "request_id": context.aws_request_id,
        "remaining_ms": context.get_remaining_time_in_millis(),
    }
