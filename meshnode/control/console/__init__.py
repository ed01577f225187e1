"""The admin console served by the control server under /console/, with OIDC single sign-on."""
