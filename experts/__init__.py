"""moeserve.experts"""
