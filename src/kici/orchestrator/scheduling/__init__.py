"""Schedules: `schedule()` triggers registered from each source's default branch, fired by cron."""
