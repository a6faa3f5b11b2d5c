//! nixq-certs: the deployment CA and the agent and master certificates.
