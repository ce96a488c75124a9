"""File drop (like Taildrop): peer to peer, inside the tunnel, never through control.

``peerapi`` holds the offer/resume protocol, the receiving peer API server and the
resumable sender; ``inbox`` is the atomic, quota-bounded receiving directory.
"""
