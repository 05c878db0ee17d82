"""TLS certificates kept in the replicated state (issue 13).

pem.py checks a chain and key an operator hands in; sealing.py encrypts the private key with
a key derived from the cluster secret before it is proposed to Raft, so the journal,
snapshots, API answers and logs never hold it in plaintext.
"""
