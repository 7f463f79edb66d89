"""Offline replay of traffic traces through a model of the cluster."""
