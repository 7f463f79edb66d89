"""moeserve.cluster"""
