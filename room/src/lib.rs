//! room: the long-connection gateway that holds device connections (built in a later issue).
