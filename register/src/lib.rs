//! register: the global session store, sharded into slots (built in a later issue).
