"""moeserve.router"""
