"""cmdlog: a replicated command log for actions that must never happen twice."""
