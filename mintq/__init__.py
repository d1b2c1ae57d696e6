"""Domain logic of mintq: payments, the queue, batching and chain access.

Modules here take their collaborators (sessions, the chain, Redis) as arguments so that
both the HTTP edge (`app/`) and the workers (`tasks/`) call them, and tests call them directly.
"""
