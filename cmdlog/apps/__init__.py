"""Apps that ship with cmdlog; `cmdlog.apps.example:app` is served by default."""
