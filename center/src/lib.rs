//! center: the senders' API, dispatcher and coordinator (built in a later issue).
