"""moeserve.models"""
