//! Scheduler (in progress)
