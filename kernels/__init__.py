"""moeserve.kernels"""
