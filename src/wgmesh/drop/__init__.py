"""File drop (like Taildrop): peer to peer, inside the tunnel, never through control.

``protocol`` is the offer/resume protocol (pure: offers, names, identities,
admission, refusals); ``server`` the receiving peer API; ``sender`` the
resumable sender; ``inbox`` the atomic, quota-bounded receiving directory.
"""
