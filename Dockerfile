# syntax=docker/dockerfile:1
FROM node:24-alpine AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json moleculer.config.ts ./
COPY lib lib
COPY mixins mixins
COPY services services
RUN npm run build

FROM node:24-alpine
ENV NODE_ENV=production
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force
COPY --from=build /app/dist ./dist
USER node
# SERVICES selects the service(s) of this container, e.g. SERVICES=products.
ENV SERVICEDIR=dist/services
CMD ["node", "dist/runner.js", "--config", "dist/moleculer.config.js"]
