"""The leader's controller: the work queue, pure decisions, and the runtime on engines."""
