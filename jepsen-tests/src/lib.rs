//! jepsen-tests: fault injection against real Longlink processes (built in a later issue).
