"""Conversations and messages of the agent."""
